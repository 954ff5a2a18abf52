#!/usr/bin/env python3
"""Walks the OAuth connect flow the way a user's browser does, for scripts/run.

    connect-as-browser.py API_BASE SERVICE_KEY USER_ID

Asks mcp-worker's API for an authorize URL, opens it at the provider, submits the login form
as USER_ID (allow), follows the provider's redirect to mcp-worker's callback, then confirms the
flow for USER_ID as the chat backend would, and prints each step. Standard library only; exits non-zero if any step does not answer as expected.
"""
import html.parser
import json
import sys
import urllib.error
import urllib.parse
import urllib.request


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


opener = urllib.request.build_opener(NoRedirect)


def request(method, url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with opener.open(req) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:  # 3xx and 4xx arrive here without redirects
        # (headers stay an email.message.Message: lookups ignore case)
        return error.code, error.headers, error.read().decode()


class HiddenInputs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.fields = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "input" and attrs.get("type") == "hidden":
            self.fields.append((attrs["name"], attrs.get("value", "")))


def main():
    api, service_key, user = sys.argv[1:4]
    status, _, body = request(
        "POST",
        f"{api}/v1/connections/qlik/authorize",
        json.dumps({"user_id": user}).encode(),
        {"Authorization": f"Bearer {service_key}", "Content-Type": "application/json"},
    )
    assert status == 200, (status, body)
    authorize_url = json.loads(body)["authorize_url"]
    print(f"1. mcp-worker gave the authorize URL: {authorize_url[:90]}...")

    status, _, page = request("GET", authorize_url)
    assert status == 200, (status, page)
    form = HiddenInputs()
    form.feed(page)
    print(f"2. the provider showed its login page ({len(form.fields)} hidden fields)")

    provider = authorize_url.split("/authorize")[0]
    fields = form.fields + [("username", user), ("decision", "allow")]
    status, headers, _ = request(
        "POST", f"{provider}/login", urllib.parse.urlencode(fields).encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 302, status
    callback = headers["Location"]
    print(f"3. signed in as {user}; the provider redirects to {callback.split('?')[0]}")

    status, headers, body = request("GET", callback)
    assert status == 303, (status, body)
    landed = headers["Location"]
    print(f"4. mcp-worker holds the tokens and sent the browser to {landed.split('?')[0]}")
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(landed).query).get("connect_code", [None])[0]
    if code is None:  # http.confirm_connections = false: stored already
        print("   (no connect_code: the callback stored the tokens itself)")
        return
    # The chat backend's part: the page at return_to knows who is logged in, and confirms.
    status, _, body = request(
        "POST",
        f"{api}/v1/connections/qlik/confirm",
        json.dumps({"user_id": user, "connect_code": code}).encode(),
        {"Authorization": f"Bearer {service_key}", "Content-Type": "application/json"},
    )
    assert status == 204, (status, body)
    print(f"5. the chat backend confirmed the flow for {user}: the tokens are stored")


if __name__ == "__main__":
    main()
