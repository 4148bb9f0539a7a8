"""loramux behind Ray Serve (`pip install loramux[ray]`): N engine replicas behind one OpenAI
ingress, with the adapter named in `model` as Ray's multiplexed model id. See app.py."""
