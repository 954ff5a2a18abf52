//! Real messages the worker produces, validated against the JSON Schemas in `schemas/`.
