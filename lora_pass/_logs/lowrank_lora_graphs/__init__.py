"""Installed as the top-level name `lowrank_lora_graphs` so that `TORCH_LOGS="lowrank_lora_graphs"` is a
valid setting when torch parses it at import, before lora_pass registers the artifact
(compat.register_torch_logs)."""
