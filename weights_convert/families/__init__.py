"""One module per source format: how its config maps onto ours and how its keys map onto our modules."""
