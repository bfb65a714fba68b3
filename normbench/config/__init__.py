"""normbench's configuration: schemas (types and keys), resolvers, the config tree, and
composition (`normbench.config.compose.compose_jobs`)."""
