"""lollms_fast: a fast, self-hosted LLM chat server speaking the 2023 lollms-webui API."""

__version__ = "0.1.0"
