//! JSON objects as text, normalized without reordering: a client's `request_params` are echoed
//! in the client's key order, so they are kept as text, but without the whitespace a body may be
//! padded with (eight signed 9 MiB bodies of spaces once grew the store by 400 MB) and without
//! the keys that are stored elsewhere.

/// `text`, a JSON object, without insignificant whitespace and without the top-level keys in
/// `drop`; the other keys keep their order and values. None if `text` is not a JSON object.
pub fn compact_object(text: &str, drop: &[&str]) -> Option<String> {
    // Valid JSON from here on: the scan below only has to tell strings from the rest.
    let parsed: serde_json::Value = serde_json::from_str(text).ok()?;
    if !parsed.is_object() {
        return None;
    }
    let mut entries: Vec<String> = Vec::new();
    let mut current = String::new();
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for c in text.chars() {
        if in_string {
            current.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                current.push(c);
            }
            ' ' | '\t' | '\n' | '\r' => {}
            '{' | '[' => {
                depth += 1;
                if depth > 1 {
                    current.push(c);
                }
            }
            '}' | ']' => {
                depth -= 1;
                if depth > 0 {
                    current.push(c);
                }
            }
            ',' if depth == 1 => entries.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        entries.push(current);
    }
    let kept: Vec<String> = entries
        .into_iter()
        .filter(|e| {
            let key = serde_json::Deserializer::from_str(e)
                .into_iter::<String>()
                .next()
                .and_then(Result::ok);
            !key.is_some_and(|k| drop.contains(&k.as_str()))
        })
        .collect();
    Some(format!("{{{}}}", kept.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_goes_and_order_and_strings_stay() {
        let text = "{ \"type\" :\n \"git\",\t\"url\": \"a b, {c}\\\" d\",  \"config\": { \"x\" : [1, 2 ,{\"y\": \" \"}] } }";
        assert_eq!(
            compact_object(text, &[]).unwrap(),
            r#"{"type":"git","url":"a b, {c}\" d","config":{"x":[1,2,{"y":" "}]}}"#
        );
    }

    #[test]
    fn dropped_keys_go_at_the_top_level_only() {
        let text = r#"{"atoms_override": ["a", "b"], "type": "directory", "config": {"atoms_override": 1}}"#;
        assert_eq!(
            compact_object(text, &["atoms_override"]).unwrap(),
            r#"{"type":"directory","config":{"atoms_override":1}}"#
        );
        assert_eq!(
            compact_object(r#"{"atoms_override": []}"#, &["atoms_override"]).unwrap(),
            "{}"
        );
        assert_eq!(compact_object("{ }", &[]).unwrap(), "{}");
    }

    #[test]
    fn not_an_object_is_none() {
        for text in ["[1]", "\"x\"", "{", "", "{\"a\": }"] {
            assert_eq!(compact_object(text, &[]), None, "{text}");
        }
    }

    #[test]
    fn the_result_parses_to_the_same_value() {
        let text = "{\"a\" : { \"b\" : [ true , null , 1.5e3 , \"\\u00e9 \\\\\" ] }, \"c\": \"\" }";
        let got = compact_object(text, &[]).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&got).unwrap(),
            serde_json::from_str::<serde_json::Value>(text).unwrap()
        );
    }
}
