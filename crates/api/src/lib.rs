//! hearth-api (to be filled)
