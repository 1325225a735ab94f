"""The registry source: client, auth, manifests, the layer store, compression."""
