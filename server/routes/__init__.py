"""HTTP routes, one module per concern; each is thin: validate, call, shape the answer."""
