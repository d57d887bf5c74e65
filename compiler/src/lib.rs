pub mod codes;
pub mod diag;
pub mod lexer;
pub mod source;
pub mod syntax;
