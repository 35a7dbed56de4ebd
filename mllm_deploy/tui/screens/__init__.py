"""Screens other than the chat screen."""
