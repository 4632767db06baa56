use super::*;
use serde_json::json;

fn yaml_err(text: &str) -> String {
    match parse_project_yaml(text, None) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

fn job(body: &str) -> String {
    format!("Job:\n{body}")
}

const COMPLETE_VALID_CONFIG: &str = r#"
    Best Job Ever:
        max_executors: 21
        setup_build:
            - echo "This is setup! Woo!"  # no semicolons in this section
            - sleep 1
        commands:
            - echo "Now I'm doing $THE_THING!";  # semicolons in this section
            - echo "Semicolons are fun." > /tmp/my_hard_work.txt;
        atomizers:
            - THE_THING: printf 'something with a number %d\\n' {1..50}
    "#;

const MULTI_JOB_CONFIG: &str = r#"
    First Job:
        commands:
            - echo "go"
        atomizers:
            - ENV_VAR: echo "atom"
    Second Job:
        commands:
            - echo "go"
        atomizers:
            - ENV_VAR: echo "atom"
    "#;

// ---- join_commands (spec §10.1 vectors) ----

#[test]
fn join_vector_plain() {
    assert_eq!(
        join_commands(&[Some(r#"echo "This is setup! Woo!""#), Some("sleep 1")]),
        r#"echo "This is setup! Woo!" && sleep 1"#
    );
}

#[test]
fn join_vector_semicolons() {
    assert_eq!(
        join_commands(&[
            Some(r#"echo "Now I'm doing $THE_THING!";"#),
            Some(r#"echo "Semicolons are fun." > /tmp/my_hard_work.txt;"#),
        ]),
        r#"echo "Now I'm doing $THE_THING!" && echo "Semicolons are fun." > /tmp/my_hard_work.txt"#
    );
}

#[test]
fn join_vector_nulls_skipped() {
    assert_eq!(
        join_commands(&[
            Some(r#"echo "first""#),
            None,
            None,
            None,
            Some(r#"echo "last""#)
        ]),
        r#"echo "first" && echo "last""#
    );
}

#[test]
fn join_vector_background_two_spaces() {
    assert_eq!(
        join_commands(&[
            Some(r#"echo "in the background" &"#),
            Some(r#"echo "in the foreground" ;"#),
            Some(r#"echo "another thing""#),
        ]),
        r#"echo "in the background" & echo "in the foreground"  && echo "another thing""#
    );
}

#[test]
fn join_edge_cases() {
    assert_eq!(join_commands(&[]), "");
    assert_eq!(join_commands(&[None]), "");
    assert_eq!(join_commands(&[Some("a;;;")]), "a");
    assert_eq!(join_commands(&[Some("sleep 1 &")]), "sleep 1 &");
    assert_eq!(join_commands(&[Some("a &&")]), "a");
    assert_eq!(join_commands(&[Some("  a  "), Some("\tb\n")]), "a && b");
}

// ---- YAML: valid configs ----

#[test]
fn complete_valid_config() {
    let c = parse_project_yaml(COMPLETE_VALID_CONFIG, None).unwrap();
    assert_eq!(c.name, "Best Job Ever");
    assert_eq!(c.max_executors, 21);
    assert_eq!(c.max_executors_per_slave, 0);
    assert_eq!(c.setup_build, r#"echo "This is setup! Woo!" && sleep 1"#);
    assert_eq!(c.teardown_build, "");
    assert_eq!(
        c.commands,
        r#"echo "Now I'm doing $THE_THING!" && echo "Semicolons are fun." > /tmp/my_hard_work.txt"#
    );
    assert_eq!(
        c.atomizers,
        vec![Atomizer {
            variable: "THE_THING".into(),
            command: r"printf 'something with a number %d\\n' {1..50}".into(),
        }]
    );
}

#[test]
fn valid_config_with_empty_commands() {
    let text = r#"
    PHPUnit:
        commands:
            - echo "first"
            -
            - # some YAML comment
            -
            - echo "last"
        atomizers:
            - ENV_VAR: echo "atom"
    "#;
    let c = parse_project_yaml(text, None).unwrap();
    assert_eq!(c.commands, r#"echo "first" && echo "last""#);
    assert_eq!(c.atomizers.len(), 1);
    assert_eq!(c.atomizers[0].variable, "ENV_VAR");
    assert_eq!(c.atomizers[0].command, r#"echo "atom""#);
}

#[test]
fn background_task_config() {
    let text = r#"
    PHPUnit:
        max_executors: 5
        setup_build:
            - echo "in the background" &
            - echo "in the foreground" ;
            - echo "another thing"
        atomizers:
            - VARNAME: sleep1
        commands:
            - echo "go"
    "#;
    let c = parse_project_yaml(text, None).unwrap();
    assert_eq!(
        c.setup_build,
        r#"echo "in the background" & echo "in the foreground"  && echo "another thing""#
    );
    assert_eq!(c.max_executors, 5);
}

#[test]
fn all_sections() {
    let text = job(concat!(
        "  commands: ['shell command 1', 'shell command 2;']\n",
        "  atomizers: [{TESTPATH: atomizer command}]\n",
        "  setup_build: ['setup command 1;', 'setup command 2;']\n",
        "  teardown_build: ['teardown command 1;', 'teardown command 2;']\n",
        "  max_executors: 100\n",
        "  max_executors_per_slave: 2\n",
    ));
    let c = parse_project_yaml(&text, Some("Job")).unwrap();
    assert_eq!(c.commands, "shell command 1 && shell command 2");
    assert_eq!(c.setup_build, "setup command 1 && setup command 2");
    assert_eq!(c.teardown_build, "teardown command 1 && teardown command 2");
    assert_eq!(c.max_executors, 100);
    assert_eq!(c.max_executors_per_slave, 2);
}

#[test]
fn multi_key_atomizer_mappings_are_flattened_in_order() {
    let text = job("  commands: [x]\n  atomizers:\n    - {A: a, B: b}\n    - C: c\n");
    let c = parse_project_yaml(&text, None).unwrap();
    let vars: Vec<_> = c.atomizers.iter().map(|a| a.variable.as_str()).collect();
    assert_eq!(vars, ["A", "B", "C"]);
}

#[test]
fn huge_max_executors_saturates() {
    let text =
        job("  commands: [x]\n  atomizers: [{A: a}]\n  max_executors: 9223372036854775807\n");
    assert_eq!(
        parse_project_yaml(&text, None).unwrap().max_executors,
        u32::MAX
    );
}

#[test]
fn duplicate_keys_last_value_wins() {
    let text = job("  commands: [first]\n  atomizers: [{A: a}]\n  commands: [second]\n");
    assert_eq!(parse_project_yaml(&text, None).unwrap().commands, "second");
}

#[test]
fn yaml_merge_keys_and_aliases() {
    let text = r#"
base: &base
  commands: [echo base]
  atomizers: [{A: ls}]
Other:
  <<: *base
  commands: [echo other]
"#;
    let c = parse_project_yaml(text, Some("Other")).unwrap();
    assert_eq!(c.name, "Other");
    assert_eq!(c.commands, "echo other");
    assert_eq!(c.atomizers[0].command, "ls");

    let text = concat!(
        "a: &a {commands: [one], atomizers: [{A: x}], max_executors: 3}\n",
        "b: &b {commands: [two], atomizers: [{B: y}]}\n",
        "c:\n  <<: [*b, *a]\n",
    );
    let c = parse_project_yaml(text, Some("c")).unwrap();
    // The earlier merge source wins; keys only in a later one still come through.
    assert_eq!(c.commands, "two");
    assert_eq!(c.atomizers[0].variable, "B");
    assert_eq!(c.max_executors, 3);

    let e = yaml_err("a:\n  <<: 3\n");
    assert!(
        e.contains("expected a mapping or list of mappings for merging"),
        "{e}"
    );
}

// ---- YAML: selection ----

#[test]
fn multi_job_selection() {
    assert_eq!(
        parse_project_yaml(MULTI_JOB_CONFIG, Some("Second Job"))
            .unwrap()
            .name,
        "Second Job"
    );
    assert_eq!(
        parse_project_yaml(MULTI_JOB_CONFIG, Some("First Job"))
            .unwrap()
            .name,
        "First Job"
    );
    assert_eq!(
        yaml_err(MULTI_JOB_CONFIG),
        "Multiple jobs are defined in this project but you did not specify one. \
             Specify one of the following job names: ['First Job', 'Second Job']"
    );
    assert_eq!(
        parse_project_yaml(MULTI_JOB_CONFIG, Some("Nope"))
            .unwrap_err()
            .to_string(),
        "The job \"Nope\" was not found in the loaded config. Valid jobs are: ['First Job', 'Second Job']"
    );
    assert_eq!(
        parse_project_yaml(MULTI_JOB_CONFIG, Some("Nope")).unwrap_err(),
        JobConfigError::JobNotFound {
            job: "Nope".into(),
            valid: vec!["First Job".into(), "Second Job".into()],
        }
    );
}

#[test]
fn single_job_selected_by_default_and_by_name() {
    let text = job("  commands: [x]\n  atomizers: [{A: a}]\n");
    assert_eq!(parse_project_yaml(&text, None).unwrap().name, "Job");
    assert_eq!(parse_project_yaml(&text, Some("Job")).unwrap().name, "Job");
    assert_eq!(
        parse_project_yaml(&text, Some("")).unwrap_err().to_string(),
        "The job \"\" was not found in the loaded config. Valid jobs are: ['Job']"
    );
}

#[test]
fn every_job_is_validated_even_if_another_is_requested() {
    let text = format!("{MULTI_JOB_CONFIG}\n    Broken:\n        commands: [x]\n");
    assert_eq!(
        parse_project_yaml(&text, Some("First Job"))
            .unwrap_err()
            .to_string(),
        "Definition for job \"Broken\" is missing required config sections: {'atomizers'}"
    );
}

#[test]
fn job_names_are_rendered_like_python_repr() {
    let text = "\"it's\": {commands: [x], atomizers: [{A: a}]}\n'b\\c': {commands: [x], atomizers: [{A: a}]}\n";
    assert_eq!(
        yaml_err(text),
        "Multiple jobs are defined in this project but you did not specify one. \
             Specify one of the following job names: [\"it's\", 'b\\\\c']"
    );
}

// ---- YAML: document-level errors ----

#[test]
fn not_a_dictionary() {
    for text in [
        "",
        "# only a comment\n",
        "- a\n- b\n",
        "just a string",
        "42",
    ] {
        assert_eq!(
            yaml_err(text),
            "The yaml config file could not be parsed to a dictionary",
            "{text:?}"
        );
    }
}

#[test]
fn no_jobs() {
    assert_eq!(yaml_err("{}"), "No jobs found in the config.");
    assert_eq!(
        parse_project_yaml("{}", None).unwrap_err(),
        JobConfigError::NoJobs
    );
}

#[test]
fn yaml_syntax_error_has_position() {
    let e = parse_project_yaml("Job:\n  commands: [x\n  atomizers: y\n", None).unwrap_err();
    let JobConfigError::Yaml(msg) = &e else {
        panic!("{e:?}")
    };
    assert!(msg.contains("line"), "{msg}");
    assert!(
        e.to_string()
            .starts_with("The yaml config file could not be parsed: ")
    );
}

#[test]
fn custom_tags_are_refused() {
    let e = yaml_err("Job: !foo {commands: [x]}\n");
    assert!(
        e.contains("could not determine a constructor for the tag '!foo'"),
        "{e}"
    );
}

#[test]
fn unhashable_key_is_refused() {
    let e = yaml_err("? [a, b]\n: c\n");
    assert!(e.contains("found unhashable key"), "{e}");
}

// ---- per-job validation errors ----

#[test]
fn empty_job_is_not_a_dictionary() {
    assert_eq!(
        yaml_err("\n    PHPUnit:\n    "),
        "Passed in configuration is not a dictionary for job: \"PHPUnit\"."
    );
    assert_eq!(
        yaml_err("Job: [a]\n"),
        "Passed in configuration is not a dictionary for job: \"Job\"."
    );
}

#[test]
fn missing_required_sections() {
    assert_eq!(
        yaml_err(&job("  max_executors: 5\n")),
        "Definition for job \"Job\" is missing required config sections: {'commands', 'atomizers'}"
    );
    assert_eq!(
        yaml_err(&job("  atomizers: [{TESTPATH: atomizer command}]\n")),
        "Definition for job \"Job\" is missing required config sections: {'commands'}"
    );
    let no_command = r#"
    PHPUnit:
        max_executors: 5
        setup_build:
            - echo "I don't know what I'm doing."
        atomizers:
            - VARNAME: sleep 123
    "#;
    assert_eq!(
        yaml_err(no_command),
        "Definition for job \"PHPUnit\" is missing required config sections: {'commands'}"
    );
}

#[test]
fn missing_is_reported_before_invalid_section() {
    assert_eq!(
        yaml_err(&job("  bogus: 1\n  commands: [x]\n")),
        "Definition for job \"Job\" is missing required config sections: {'atomizers'}"
    );
}

#[test]
fn invalid_section() {
    assert_eq!(
        yaml_err(&job(
            "  commands: [x]\n  timing_file: t.json\n  atomizers: [{A: a}]\n"
        )),
        "Definition for job \"Job\" contains an invalid config section \"timing_file\"."
    );
    assert_eq!(
        yaml_err(&job("  commands: [x]\n  atomizers: [{A: a}]\n  1: x\n")),
        "Definition for job \"Job\" contains an invalid config section \"1\"."
    );
}

#[test]
fn sections_are_checked_in_key_order() {
    assert_eq!(
        yaml_err(&job("  commands: x\n  atomizers: [{A: a}]\n  bogus: 1\n")),
        "Definition for job \"Job\" contains an invalid value for config section \"commands\". \
             Parser expected one of [(<class 'list'>, <class 'str'>)] but found <class 'str'>."
    );
}

#[test]
fn invalid_values() {
    let cases = [
        // A bare string instead of a list is refused, as in the original.
        (
            "  commands: echo hi\n  atomizers: [{A: a}]\n",
            "commands",
            "[(<class 'list'>, <class 'str'>)]",
            "<class 'str'>",
        ),
        (
            "  commands:\n    -\n  atomizers: [{A: a}]\n",
            "commands",
            "[(<class 'list'>, <class 'str'>)]",
            "(<class 'list'>, <class 'NoneType'>)",
        ),
        (
            "  commands: [x]\n  atomizers: [{A: a}]\n  setup_build:\n",
            "setup_build",
            "[(<class 'list'>, <class 'str'>)]",
            "<class 'NoneType'>",
        ),
        (
            "  commands: [x]\n  atomizers: [{A: a}]\n  teardown_build: [1]\n",
            "teardown_build",
            "[(<class 'list'>, <class 'str'>)]",
            "(<class 'list'>, <class 'int'>)",
        ),
        (
            "  commands: [x]\n  atomizers:\n    - \"export VARNAME='asdf'\"\n",
            "atomizers",
            "[(<class 'list'>, <class 'dict'>)]",
            "(<class 'list'>, <class 'str'>)",
        ),
        (
            "  commands: [x]\n  atomizers: {A: a}\n",
            "atomizers",
            "[(<class 'list'>, <class 'dict'>)]",
            "<class 'dict'>",
        ),
        (
            "  commands: [x]\n  atomizers: [{A: a}]\n  max_executors: '5'\n",
            "max_executors",
            "[<class 'int'>]",
            "<class 'str'>",
        ),
        (
            "  commands: [x]\n  atomizers: [{A: a}]\n  max_executors_per_slave: 2.5\n",
            "max_executors_per_slave",
            "[<class 'int'>]",
            "<class 'float'>",
        ),
        (
            "  commands: [x]\n  atomizers: [{A: a}]\n  max_executors: true\n",
            "max_executors",
            "[<class 'int'>]",
            "<class 'bool'>",
        ),
        (
            "  commands: [x]\n  atomizers: [{A: a}]\n  max_executors: [1]\n",
            "max_executors",
            "[<class 'int'>]",
            "<class 'list'>",
        ),
        // Items after the first are checked too (our addition, same message).
        (
            "  commands: [x, [y]]\n  atomizers: [{A: a}]\n",
            "commands",
            "[(<class 'list'>, <class 'str'>)]",
            "(<class 'list'>, <class 'list'>)",
        ),
        (
            "  commands: [x]\n  atomizers: [{A: a}, b]\n",
            "atomizers",
            "[(<class 'list'>, <class 'dict'>)]",
            "(<class 'list'>, <class 'str'>)",
        ),
    ];
    for (body, section, expected, found) in cases {
        assert_eq!(
            yaml_err(&job(body)),
            format!(
                "Definition for job \"Job\" contains an invalid value for config section \"{section}\". \
                     Parser expected one of {expected} but found {found}."
            ),
            "{body:?}"
        );
    }
}

#[test]
fn empty_list_section() {
    assert_eq!(
        yaml_err(&job("  commands: []\n  atomizers: [{A: a}]\n")),
        "Definition for job \"Job\" contains an empty list for config section \"commands\"."
    );
    assert_eq!(
        yaml_err(&job(
            "  commands: [x]\n  atomizers: [{A: a}]\n  setup_build: []\n"
        )),
        "Definition for job \"Job\" contains an empty list for config section \"setup_build\"."
    );
}

#[test]
fn non_positive_max_executors() {
    for (section, value) in [("max_executors", "0"), ("max_executors_per_slave", "-3")] {
        assert_eq!(
            yaml_err(&job(&format!(
                "  commands: [x]\n  atomizers: [{{A: a}}]\n  {section}: {value}\n"
            ))),
            format!(
                "Definition for job \"Job\" contains an invalid value for config section \"{section}\". \
                     Expected a positive integer but found {value}."
            )
        );
    }
}

#[test]
fn invalid_atomizer_variable() {
    for var in ["1ABC", "MY-VAR", "'A B'", "''", "1"] {
        let e = parse_project_yaml(
            &job(&format!("  commands: [x]\n  atomizers: [{{{var}: ls}}]\n")),
            None,
        )
        .unwrap_err();
        assert!(
            matches!(e, JobConfigError::InvalidAtomizerVariable { .. }),
            "{var}: {e:?}"
        );
    }
    assert_eq!(
        yaml_err(&job("  commands: [x]\n  atomizers: [{MY-VAR: ls}]\n")),
        "Definition for job \"Job\" contains an invalid atomizer variable name \"MY-VAR\". \
             Atomizer variable names must be valid shell identifiers ([A-Za-z_][A-Za-z0-9_]*)."
    );
    assert!(
        parse_project_yaml(&job("  commands: [x]\n  atomizers: [{_ok_1: ls}]\n"), None).is_ok()
    );
}

#[test]
fn invalid_atomizer_command() {
    assert_eq!(
        yaml_err(&job("  commands: [x]\n  atomizers: [{A: [ls]}]\n")),
        "Definition for job \"Job\" contains an invalid command for atomizer \"A\". \
             Expected <class 'str'> but found <class 'list'>."
    );
    assert_eq!(
        yaml_err(&job("  commands: [x]\n  atomizers: [{A: }]\n")),
        "Definition for job \"Job\" contains an invalid command for atomizer \"A\". \
             Expected <class 'str'> but found <class 'NoneType'>."
    );
}

// ---- limits ----

#[test]
fn yaml_too_large_text() {
    let text = format!(
        "Job:\n  commands: ['{}']\n  atomizers: [{{A: a}}]\n",
        "x".repeat(MAX_CONFIG_BYTES)
    );
    assert_eq!(
        parse_project_yaml(&text, None).unwrap_err(),
        JobConfigError::TooLarge
    );
    assert!(
        JobConfigError::TooLarge
            .to_string()
            .contains("1048576 bytes")
    );
}

#[test]
fn yaml_alias_bomb_is_refused() {
    let mut text = String::from("a: &a [\"lolololololololololololololololol\"]\n");
    let mut prev = 'a';
    for name in "bcdefghijklm".chars() {
        let refs = vec![format!("*{prev}"); 10].join(",");
        text.push_str(&format!("{name}: &{name} [{refs}]\n"));
        prev = name;
    }
    assert!(text.len() < 2000);
    let e = parse_project_yaml(&text, None).unwrap_err();
    assert!(
        e == JobConfigError::TooLarge
            || matches!(&e, JobConfigError::Yaml(m) if m.contains("repetition limit")),
        "{e:?}"
    );
}

#[test]
fn yaml_alias_expansion_over_the_size_limit_is_refused() {
    let refs = vec!["*big"; 20].join(", ");
    let text = format!(
        "Job:\n  commands: [&big '{}']\n  atomizers: [{{A: a}}]\n  setup_build: [{refs}]\n",
        "x".repeat(MAX_CONFIG_BYTES / 10)
    );
    assert!(text.len() < MAX_CONFIG_BYTES);
    assert_eq!(
        parse_project_yaml(&text, None).unwrap_err(),
        JobConfigError::TooLarge
    );
}

#[test]
fn large_config_under_the_limit_is_accepted() {
    let mut text = String::from("Job:\n  atomizers: [{A: a}]\n  commands: [");
    while text.len() < MAX_CONFIG_BYTES - 10 {
        text.push_str("a,");
    }
    text.push_str("a]\n");
    assert!(parse_project_yaml(&text, None).is_ok());
}

#[test]
fn yaml_depth_limit() {
    // Job mapping + sections mapping + list = 3 levels before the padding.
    let pad = |n: usize| format!("{}x{}", "[".repeat(n), "]".repeat(n));
    let ok = format!(
        "Job: {{commands: [x], atomizers: [{{A: a}}], bogus: {}}}\n",
        pad(MAX_CONFIG_DEPTH - 2)
    );
    assert!(matches!(
        parse_project_yaml(&ok, None).unwrap_err(),
        JobConfigError::InvalidSection { .. }
    ));
    let deep = format!(
        "Job: {{commands: [x], atomizers: [{{A: a}}], bogus: {}}}\n",
        pad(MAX_CONFIG_DEPTH - 1)
    );
    assert_eq!(
        parse_project_yaml(&deep, None).unwrap_err(),
        JobConfigError::TooDeep
    );
    let very_deep = format!("Job: {}\n", pad(10_000));
    assert_eq!(
        parse_project_yaml(&very_deep, None).unwrap_err(),
        JobConfigError::TooDeep
    );
    assert!(JobConfigError::TooDeep.to_string().contains("32 levels"));
}

#[test]
fn json_limits() {
    let big = json!({"commands": ["x".repeat(MAX_CONFIG_BYTES)], "atomizers": [{"A": "a"}]});
    assert_eq!(
        parse_inline_config(&big, None).unwrap_err(),
        JobConfigError::TooLarge
    );
    let big_text = big.to_string();
    assert_eq!(
        parse_inline_config_str(&big_text, None).unwrap_err(),
        JobConfigError::TooLarge
    );

    let mut deep = json!("x");
    for _ in 0..MAX_CONFIG_DEPTH {
        deep = json!([deep]);
    }
    let cfg = json!({"commands": ["x"], "atomizers": [{"A": "a"}], "zzz": deep});
    assert_eq!(
        parse_inline_config(&cfg, None).unwrap_err(),
        JobConfigError::TooDeep
    );
    assert_eq!(
        parse_inline_config_str(&cfg.to_string(), None).unwrap_err(),
        JobConfigError::TooDeep
    );

    // A value far deeper than any parser would produce is still refused without
    // recursing all the way down.
    let mut deeper = json!("x");
    for _ in 0..300 {
        deeper = json!([deeper]);
    }
    assert_eq!(
        parse_inline_config(&deeper, None).unwrap_err(),
        JobConfigError::TooDeep
    );
}

// ---- inline config ----

#[test]
fn inline_config_valid() {
    let cfg = json!({
        "commands": ["echo $TOKEN;"],
        "atomizers": [{"TOKEN": "seq 3"}],
        "setup_build": ["make", null, "make install"],
        "max_executors_per_slave": 1,
    });
    let c = parse_inline_config(&cfg, Some("Inline")).unwrap();
    assert_eq!(c.name, "Inline");
    assert_eq!(c.commands, "echo $TOKEN");
    assert_eq!(c.setup_build, "make && make install");
    assert_eq!(c.max_executors_per_slave, 1);
    assert_eq!(c.max_executors, 0);
    assert_eq!(
        c.atomizers,
        vec![Atomizer {
            variable: "TOKEN".into(),
            command: "seq 3".into()
        }]
    );

    let unnamed = parse_inline_config(&cfg, None).unwrap();
    assert_eq!(unnamed.name, "");
    assert_eq!(
        parse_inline_config_str(&cfg.to_string(), Some("Inline")).unwrap(),
        c
    );
}

#[test]
fn inline_config_errors() {
    assert_eq!(
        parse_inline_config(&json!("commands: [x]"), None)
            .unwrap_err()
            .to_string(),
        "Passed in configuration is not a dictionary for job: \"None\"."
    );
    assert_eq!(
        parse_inline_config(&json!([1]), Some("J"))
            .unwrap_err()
            .to_string(),
        "Passed in configuration is not a dictionary for job: \"J\"."
    );
    assert_eq!(
        parse_inline_config(&json!({"atomizers": [{"A": "a"}]}), None)
            .unwrap_err()
            .to_string(),
        "Definition for job \"None\" is missing required config sections: {'commands'}"
    );
    assert_eq!(
        parse_inline_config(
            &json!({"commands": ["x"], "atomizers": [{"A": "a"}], "nope": 1}),
            Some("J")
        )
        .unwrap_err()
        .to_string(),
        "Definition for job \"J\" contains an invalid config section \"nope\"."
    );
    assert_eq!(
        parse_inline_config(
            &json!({"commands": ["x"], "atomizers": [{"A": "a"}], "max_executors": 1.0}),
            None
        )
        .unwrap_err()
        .to_string(),
        "Definition for job \"None\" contains an invalid value for config section \"max_executors\". \
             Parser expected one of [<class 'int'>] but found <class 'float'>."
    );
    // JSON has no merge keys.
    assert_eq!(
        parse_inline_config(
            &json!({"commands": ["x"], "atomizers": [{"A": "a"}], "<<": {}}),
            None
        )
        .unwrap_err()
        .to_string(),
        "Definition for job \"None\" contains an invalid config section \"<<\"."
    );
}

#[test]
fn inline_config_str_keeps_key_order_and_reports_syntax() {
    // With the text's order, "zzz" is reported before the bad "commands" value.
    let text = r#"{"zzz": 1, "commands": "x", "atomizers": [{"A": "a"}]}"#;
    assert_eq!(
        parse_inline_config_str(text, None).unwrap_err().to_string(),
        "Definition for job \"None\" contains an invalid config section \"zzz\"."
    );
    let e = parse_inline_config_str(r#"{"commands": ["x"],"#, None).unwrap_err();
    assert!(
        matches!(&e, JobConfigError::Json(m) if m.contains("line 1")),
        "{e:?}"
    );
    let e = parse_inline_config_str(
        r#"{"commands": ["x"], "atomizers": [{"A": "a"}]} trailing"#,
        None,
    )
    .unwrap_err();
    assert!(matches!(e, JobConfigError::Json(_)), "{e:?}");
}

// ---- atoms ----

#[test]
fn atoms_replace_project_dir() {
    let output = "/tmp/test/directory/test_a.py\n/tmp/test/directory/test_b.py\n/tmp/test/directory/test_c.py\n";
    assert_eq!(
        atoms_from_output("TEST_FILE", output, "/tmp/test/directory"),
        vec![
            r#"export TEST_FILE="$PROJECT_DIR/test_a.py";"#,
            r#"export TEST_FILE="$PROJECT_DIR/test_b.py";"#,
            r#"export TEST_FILE="$PROJECT_DIR/test_c.py";"#,
        ]
    );
    assert_eq!(
        atoms_from_output("V", "/p/x /p/y", "/p"),
        vec![r#"export V="$PROJECT_DIR/x $PROJECT_DIR/y";"#]
    );
    assert_eq!(
        atoms_from_output("V", "/p/x", ""),
        vec![r#"export V="/p/x";"#]
    );
}

#[test]
fn atoms_strip_and_split_like_python() {
    assert!(atoms_from_output("V", "", "/p").is_empty());
    assert!(atoms_from_output("V", " \n\t\n ", "/p").is_empty());
    // Interior blank lines are kept, as in the original.
    assert_eq!(
        atoms_from_output("V", "\n\n a\r\n\r\n b \n", "/p"),
        vec![r#"export V="a";"#, r#"export V="";"#, r#"export V=" b";"#]
    );
    assert_eq!(
        atoms_from_output("V", "a\rb\u{2028}c", ""),
        vec![r#"export V="a";"#, r#"export V="b";"#, r#"export V="c";"#]
    );
}

#[test]
fn atom_command_joins_with_space() {
    assert_eq!(
        atom_command(r#"export TOKEN="a";"#, "echo $TOKEN && true"),
        r#"export TOKEN="a"; echo $TOKEN && true"#
    );
}

// ---- Python rendering helpers ----

#[test]
fn python_reprs() {
    assert_eq!(py_repr("abc"), "'abc'");
    assert_eq!(py_repr("it's"), "\"it's\"");
    assert_eq!(py_repr("'\""), "'\\'\"'");
    assert_eq!(py_repr("a\nb\t\u{1}\u{85}"), "'a\\nb\\t\\x01\\x85'");
    assert_eq!(py_repr("é"), "'é'");
    assert_eq!(py_list(&[]), "[]");
    assert_eq!(py_set(&["a".into(), "b".into()]), "{'a', 'b'}");
    assert_eq!(py_float(1.0), "1.0");
    assert_eq!(py_float(1e20), "1e+20");
    assert_eq!(py_splitlines("a\n"), vec!["a"]);
    assert_eq!(py_strip("\u{1c} a \u{a0}"), "a");
}
