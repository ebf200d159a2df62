"""Conversation memory: the embedder, the vector index, and the manager that keeps both in step
with the SQL store. Submodules are imported where used, so importing the package stays light."""
