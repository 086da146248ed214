"""The Label Studio ML backend serving HybridGL (a thin adapter over the hybridgl library)."""
