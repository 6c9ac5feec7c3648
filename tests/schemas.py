"""JSON schemas of pico-llm's run logs and sweep files: what the notebook relies on, checked
by the tests (pico-llm itself checks only the schema_version field when reading)."""


def runlog_schema(pico) -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "pico-llm run log",
        "type": "object",
        "required": ["schema_version", "kind", "run_name", "created", "args", "environment", "data",
                     "models"],
        "properties": {
            "schema_version": {"const": pico.RUNLOG_SCHEMA_VERSION},
            "kind": {"const": "run"},
            "run_name": {"type": "string"},
            "created": {"type": "string"},
            "run_id": {"type": "string"},
            "status": {"enum": ["running", "finished", "failed", "interrupted"]},
            "error": {"type": "string"},
            "process": {"type": "object", "required": ["host", "pid"]},
            "args": {"type": "object"},
            "environment": {
                "type": "object",
                "required": ["torch", "python", "device", "threads"],
            },
            "data": {
                "type": "object",
                "required": ["tokenizer", "vocab_size", "sources"],
            },
            "models": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["parameters", "training_flops_per_token", "history", "test_history",
                                 "samples"],
                    "properties": {
                        "parameters": {"type": "integer", "minimum": 1},
                        "training_flops_per_token": {"type": "integer", "minimum": 0},
                        "config": {"type": "object"},
                        "history": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["step", "epoch", "train_loss", "lr", "tokens_seen",
                                             "elapsed_s", "tokens_per_s"],
                                "properties": {
                                    "step": {"type": "integer", "minimum": 1},
                                    "epoch": {"type": "integer", "minimum": 1},
                                    "train_loss": {"type": "number"},
                                    "lr": {"type": "number", "minimum": 0},
                                    "tokens_seen": {"type": "integer", "minimum": 0},
                                    "elapsed_s": {"type": "number", "minimum": 0},
                                    "tokens_per_s": {"type": "number", "minimum": 0},
                                },
                            },
                        },
                        "test_history": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["epoch", "step", "test_loss", "test_bits_per_byte",
                                             "test_tokens"],
                            },
                        },
                        "samples": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["step", "rule", "prompt", "text"],
                            },
                        },
                        "final": {"type": "object"},
                        "attention_maps": {"type": "string"},
                        "monosemantic": {"type": "string"},
                        "length_changes": {
                            "type": "array",
                            "items": {"type": "object", "required": ["step", "flag", "old", "new"]},
                        },
                        "expert_usage": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["epoch", "fractions"],
                                "properties": {
                                    "epoch": {"type": "integer", "minimum": 1},
                                    "fractions": {"type": "array", "items": {
                                        "type": "array", "items": {"type": "number", "minimum": 0}}},
                                },
                            },
                        },
                    },
                },
            },
        },
    }


def sweep_schema(pico) -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "pico-llm sweep",
        "type": "object",
        "required": ["schema_version", "kind", "sweep", "scale", "created", "status", "config",
                     "environment", "points"],
        "properties": {
            "schema_version": {"const": pico.SWEEP_SCHEMA_VERSION},
            "kind": {"const": "sweep"},
            "sweep": {"enum": list(pico.SWEEP_NAMES)},
            "scale": {"type": "string"},
            "status": {"enum": ["running", "finished"]},
            "config": {"type": "object", "required": ["tokenizer", "scale", "args"]},
            "environment": {"type": "object", "required": ["torch", "python", "device", "threads"]},
            "points": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["key", "model", "settings", "train_loss", "test_loss",
                                 "tokens_per_s", "wall_time_s"],
                    "properties": {
                        "key": {"type": "string"},
                        "model": {"type": "string"},
                        "settings": {"type": "object"},
                        "parameters": {"type": "integer", "minimum": 1},
                        "train_loss": {"type": ["number", "null"]},
                        "test_loss": {"type": ["number", "null"]},
                        "tokens_per_s": {"type": ["number", "null"], "minimum": 0},
                        "wall_time_s": {"type": "number", "minimum": 0},
                        "diverged": {"type": "boolean"},
                        "epochs": {"type": "array"},
                        "samples": {"type": "array"},
                        "diversity": {"type": "object"},
                    },
                },
            },
        },
    }
