"""The OpenAI API: request parsing, chat templates, tool calls and reasoning, response shaping, and
the /v1 routes."""
