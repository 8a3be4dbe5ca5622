"""Online monitoring shared by gateways, the model manager and training code: value sketches, drift measures
against training statistics, and the training statistics themselves."""
