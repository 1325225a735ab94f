"""The cache folder: its layout, instance records, index.json, publishing, verify and status."""
