"""Synthetic task families: a deterministic generator of prompts with answers, and a verifier.

The trainer never imports a task; tasks only write prompt rows and check answers.
"""
