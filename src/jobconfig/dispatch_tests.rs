use super::*;

#[test]
fn dispatch_mode_is_read_and_checked() {
    let base = "J:\n  commands: [x]\n  atomizers: [{A: a}]\n";
    let c = parse_project_yaml(base, None).unwrap();
    assert_eq!(c.dispatch, crate::proto::DispatchMode::Queue as i32);
    let c = parse_project_yaml(&format!("{base}  dispatch: clusterrunner\n"), None).unwrap();
    assert_eq!(c.dispatch, crate::proto::DispatchMode::Clusterrunner as i32);
    let e = parse_project_yaml(&format!("{base}  dispatch: fastest\n"), None).unwrap_err();
    assert!(
        e.to_string()
            .contains("Expected \"queue\" or \"clusterrunner\" but found \"fastest\""),
        "{e}"
    );
    let e = parse_project_yaml(&format!("{base}  dispatch: [queue]\n"), None).unwrap_err();
    assert!(
        e.to_string()
            .contains("invalid value for config section \"dispatch\""),
        "{e}"
    );
}
