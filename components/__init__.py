"""cnnflow components: the registry and everything registered in it."""
