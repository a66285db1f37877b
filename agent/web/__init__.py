"""The agent's web page: server-rendered HTML of the fleet and of one stack, and its static assets (package data).

Pure rendering from `schemas.view` models; the api serves it. No framework, no CDN, no external font.
"""
