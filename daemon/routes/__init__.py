"""The API's routes, one module per concern; each holds its schemas, handlers and their docs."""
