//! hearth-agent (to be filled)
