"""For trainers: read the cache, check out a repository as an overlay or a copy."""
