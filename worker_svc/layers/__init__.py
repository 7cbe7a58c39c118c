"""Building blocks of the models: parallel linear layers, embeddings, norms, rotary, attention."""
