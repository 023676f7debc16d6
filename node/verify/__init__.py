"""Verified inference: judging answers, local and spot checks, fraud reports."""
