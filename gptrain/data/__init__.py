"""Data: corpora into verified token shards (`prepare`), and shards into training/validation batches (`loader`)."""
