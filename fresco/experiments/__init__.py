"""What gateways, the experiment service and clients share about experiments: the assignment specification."""
