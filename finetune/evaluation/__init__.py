"""Evaluation of a finished run: base, adapter and merged model side by side."""
