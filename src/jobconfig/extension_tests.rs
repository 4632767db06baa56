use super::*;

#[test]
fn retries_and_timeouts_are_read() {
    let c = parse_project_yaml(
            "J:\n  commands: [x]\n  atomizers: [{A: a}]\n  retries: 2\n  atom_timeout: 30\n  build_timeout: 600\n",
            None,
        )
        .unwrap();
    assert_eq!(
        (c.retries, c.atom_timeout_seconds, c.build_timeout_seconds),
        (2, 30, 600)
    );
    let c = parse_project_yaml(
            "J:\n  commands: [x]\n  atomizers: [{A: a}]\n  atom_timeout: 4294967295\n  build_timeout: 1\n",
            None,
        )
        .unwrap();
    assert_eq!(
        (c.atom_timeout_seconds, c.build_timeout_seconds),
        (MAX_TIMEOUT_SECONDS, 1)
    );
    let c = parse_project_yaml(
        "J:\n  commands: [x]\n  atomizers: [{A: a}]\n  retries: 0\n",
        None,
    )
    .unwrap();
    assert_eq!(c.retries, 0);
}

#[test]
fn bad_retries_and_timeouts_are_refused() {
    for (section, value, needle) in [
        (
            "retries",
            "-1",
            "Expected an integer from 0 to 10 but found -1.",
        ),
        (
            "retries",
            "11",
            "Expected an integer from 0 to 10 but found 11.",
        ),
        (
            "atom_timeout",
            "0",
            "Expected a positive integer but found 0.",
        ),
        (
            "build_timeout",
            "-5",
            "Expected a positive integer but found -5.",
        ),
        // One past the range used to be clamped to it silently.
        (
            "atom_timeout",
            "4294967296",
            "Expected a number of seconds from 1 to 4294967295 but found 4294967296.",
        ),
        (
            "build_timeout",
            "99999999999999999999",
            "Expected a number of seconds from 1 to 4294967295 but found 99999999999999999999.",
        ),
        (
            "atom_timeout",
            "'10s'",
            "Parser expected one of [<class 'int'>] but found <class 'str'>",
        ),
    ] {
        let yaml = format!("J:\n  commands: [x]\n  atomizers: [{{A: a}}]\n  {section}: {value}\n");
        let e = parse_project_yaml(&yaml, None).unwrap_err().to_string();
        assert!(e.contains(&format!("config section \"{section}\"")), "{e}");
        assert!(e.contains(needle), "{e} should contain {needle}");
    }
}
