"""The remote stage cache: stage entries and results shared through object storage (any fsspec URL).

store.py speaks to the storage; entries.py publishes and fetches verified stage entries and results;
session.py holds the cache a build uses; admin.py lists, prunes and verifies what the store holds.
"""
