"""Personalities: the 2023 folder format, built-in ones as package data, user ones on disk."""
