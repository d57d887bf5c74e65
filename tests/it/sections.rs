//! The file format of the reload and convert corpora: a case is a sequence of
//! sections, each opened by a line `--- NAME ---`.

/// The sections of `text` in order, as (name, body); text before the first
/// section is ignored.
pub fn sections(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.split_inclusive('\n') {
        if let Some(name) = line
            .trim_end()
            .strip_prefix("--- ")
            .and_then(|l| l.strip_suffix(" ---"))
        {
            out.push((name.to_owned(), String::new()));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
        }
    }
    out
}
