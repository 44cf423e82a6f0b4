"""The retrieval layer: the FAISS catalogue index (search, filters, recommendations), text
search through MiniLM, and the tags derived from a category and a photo."""
