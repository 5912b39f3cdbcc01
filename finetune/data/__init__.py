"""Data: reading rows from files, folders and the hub (`rows`), and turning them into tokens for each task
(`sft`: conversations and texts with loss masks; `classification`: texts with label ids)."""
