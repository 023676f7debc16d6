"""Content-addressed models: CIDs, verified fetching, the cache, IPFS and peers as sources, the default model."""
