"""Composing a worker or a requester from the layers below."""
