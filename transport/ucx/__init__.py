"""``ucx://``: transfers over UCX through ucxx (optional extra ``kvstore[ucx]``)."""
