"""Tar streams into folders, safely: parsing, members, OCI layer rules, writing, digests."""
