"""Ten JSON schemas for structured-output tests (nested objects, arrays, enums, required
fields, anyOf, patterns), each with one valid instance. Every string and array is bounded,
so that a completed output always fits the tests' max_tokens."""

from __future__ import annotations

from typing import Any

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string", "maxLength": 40},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "order_id": {"type": "integer", "minimum": 1, "maximum": 99999},
            "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    },
                    "required": ["sku", "quantity"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["order_id", "status", "items"],
        "additionalProperties": False,
    },
    "contact": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "address": {
                "type": "object",
                "properties": {
                    "street": {"type": "string", "maxLength": 40},
                    "city": {"type": "string", "maxLength": 30},
                    "country": {"enum": ["FR", "DE", "US", "JP", "BR"]},
                },
                "required": ["city", "country"],
                "additionalProperties": False,
            },
            "phones": {"type": "array", "items": {"type": "string", "pattern": "^[0-9]{6,10}$"},
                       "maxItems": 2},
        },
        "required": ["name", "address", "phones"],
        "additionalProperties": False,
    },
    "forecast": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "day": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]},
                        "high": {"type": "integer", "minimum": -50, "maximum": 60},
                        "low": {"type": "integer", "minimum": -50, "maximum": 60},
                    },
                    "required": ["day", "high", "low"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["city", "unit", "days"],
        "additionalProperties": False,
    },
    "book": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 50},
            "published": {"type": "boolean"},
            "rating": {"type": ["integer", "null"], "minimum": 1, "maximum": 5},
            "genres": {"type": "array", "items": {"enum": ["fiction", "science", "history",
                                                           "poetry"]},
                       "maxItems": 3},
        },
        "required": ["title", "published", "rating", "genres"],
        "additionalProperties": False,
    },
    "team": {
        "type": "object",
        "properties": {
            "team": {"type": "string", "maxLength": 30},
            "members": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 20},
                        "role": {"enum": ["lead", "engineer", "designer"]},
                        "skills": {"type": "array", "maxItems": 2,
                                   "items": {"type": "string", "maxLength": 15}},
                    },
                    "required": ["name", "role", "skills"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["team", "members"],
        "additionalProperties": False,
    },
    "shape": {
        "type": "object",
        "properties": {
            "shape": {
                "anyOf": [
                    {"type": "object",
                     "properties": {"kind": {"const": "circle"},
                                    "radius": {"type": "integer", "minimum": 1,
                                               "maximum": 100}},
                     "required": ["kind", "radius"], "additionalProperties": False},
                    {"type": "object",
                     "properties": {"kind": {"const": "rect"},
                                    "width": {"type": "integer", "minimum": 1, "maximum": 100},
                                    "height": {"type": "integer", "minimum": 1,
                                               "maximum": 100}},
                     "required": ["kind", "width", "height"], "additionalProperties": False},
                ],
            },
            "color": {"enum": ["red", "green", "blue"]},
        },
        "required": ["shape", "color"],
        "additionalProperties": False,
    },
    "recipe": {
        "type": "object",
        "properties": {
            "dish": {"type": "string", "maxLength": 30},
            "servings": {"type": "integer", "minimum": 1, "maximum": 12},
            "ingredients": {
                "type": "array",
                "minItems": 1,
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {
                        "item": {"type": "string", "maxLength": 20},
                        "grams": {"type": "integer", "minimum": 1, "maximum": 5000},
                    },
                    "required": ["item", "grams"],
                    "additionalProperties": False,
                },
            },
            "vegetarian": {"type": "boolean"},
        },
        "required": ["dish", "servings", "ingredients", "vegetarian"],
        "additionalProperties": False,
    },
    "event": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
            "location": {
                "type": "object",
                "properties": {
                    "lat": {"type": "integer", "minimum": -90, "maximum": 90},
                    "lon": {"type": "integer", "minimum": -180, "maximum": 180},
                },
                "required": ["lat", "lon"],
                "additionalProperties": False,
            },
            "online": {"type": "boolean"},
        },
        "required": ["title", "date", "location", "online"],
        "additionalProperties": False,
    },
    "settings": {
        "type": "object",
        "properties": {
            "version": {"type": "integer", "minimum": 1, "maximum": 9},
            "mode": {"enum": ["fast", "balanced", "accurate"]},
            "features": {
                "type": "object",
                "properties": {
                    "logging": {"type": "boolean"},
                    "cache": {"type": "boolean"},
                    "retries": {"type": "integer", "minimum": 0, "maximum": 5},
                },
                "required": ["logging", "cache", "retries"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                     "maxItems": 3},
        },
        "required": ["version", "mode", "features", "tags"],
        "additionalProperties": False,
    },
}

INSTANCES: dict[str, object] = {
    "person": {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org"},
    "order": {"order_id": 1042, "status": "shipped",
              "items": [{"sku": "ABC-1234", "quantity": 2}, {"sku": "XYZ-0001", "quantity": 1}]},
    "contact": {"name": "Jean", "address": {"street": "1 rue de Rivoli", "city": "Paris",
                                            "country": "FR"}, "phones": ["0612345678"]},
    "forecast": {"city": "Oslo", "unit": "celsius",
                 "days": [{"day": "mon", "high": 12, "low": -3}]},
    "book": {"title": "Dune", "published": True, "rating": None, "genres": ["fiction"]},
    "team": {"team": "Core", "members": [{"name": "Lin", "role": "lead",
                                          "skills": ["rust", "go"]}]},
    "shape": {"shape": {"kind": "rect", "width": 3, "height": 4}, "color": "blue"},
    "recipe": {"dish": "Pancakes", "servings": 4,
               "ingredients": [{"item": "flour", "grams": 250}], "vegetarian": True},
    "event": {"title": "Launch", "date": "2025-06-01", "location": {"lat": 48, "lon": 2},
              "online": False},
    "settings": {"version": 2, "mode": "fast",
                 "features": {"logging": True, "cache": False, "retries": 3}, "tags": ["a"]},
}
