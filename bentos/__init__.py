"""The BentoML service (service.py) and what it is made of; built into a serving-only bento."""
