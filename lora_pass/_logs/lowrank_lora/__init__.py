"""Installed as the top-level name `lowrank_lora` so that `TORCH_LOGS="lowrank_lora"` is a valid
setting when torch parses it at import, before lora_pass registers the name (compat.register_torch_logs)."""
