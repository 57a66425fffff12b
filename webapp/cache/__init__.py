"""The response cache: exact and semantic hits for context-free questions, never a wrong one."""
