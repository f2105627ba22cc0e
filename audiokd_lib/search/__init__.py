"""Audio similarity search (notebook 10): multi-modal segment features, a gated-fusion embedding learned
with a metric loss and distilled from a larger one, and a FAISS index queried with feedback and MMR."""
