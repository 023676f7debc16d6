"""HTTP: the OpenAI-compatible gateway, the web page's API."""
