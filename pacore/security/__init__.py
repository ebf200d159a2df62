"""Security primitives: password hashing, signed tokens, provider-key encryption, secrets."""
