//! The command line: help screens and start-up failures.

use crate::harness::{ocsync, output, stderr};

#[tokio::test]
async fn bad_configuration_names_the_variable_and_connects_nowhere() {
    let cases = [
        ("DATABASE_URL", "nonsense"),
        ("DATABASE_URL", "mysql://localhost/db"),
        ("DATABASE_MAX_CONNECTIONS", "lots"),
        ("LOG_FORMAT", "yaml"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url"),
    ];
    for (var, value) in cases {
        for sub in ["migrate", "api"] {
            let mut cmd = ocsync();
            cmd.arg(sub).env(var, value);
            let out = output(cmd).await;
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{sub} {var}={value}: {err}");
            assert!(
                err.starts_with(&format!("ocsync: configuration error: {var}: ")),
                "{sub} {var}={value}: {err}"
            );
            assert!(
                !err.contains("panicked") && !err.contains("backtrace"),
                "{err}"
            );
            assert_eq!(err.lines().count(), 1, "one line, not a trace: {err}");
            assert!(out.stdout.is_empty());
        }
    }
}

#[tokio::test]
async fn unreachable_database_fails_with_the_server_but_not_the_password() {
    let mut cmd = ocsync();
    cmd.arg("migrate")
        .env("DATABASE_URL", "postgres://u:s3cret@127.0.0.1:1/x")
        .env("DATABASE_CONNECT_TIMEOUT_SECS", "2");
    let out = output(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot connect to the database 127.0.0.1:1/x"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
}

#[tokio::test]
async fn every_command_explains_itself_in_one_screen() {
    for args in [
        vec!["--help"],
        vec!["migrate", "--help"],
        vec!["api", "--help"],
        vec!["odm", "--help"],
        vec!["odm", "stats", "--help"],
        vec!["odm", "dump", "--help"],
    ] {
        let mut cmd = ocsync();
        cmd.args(&args);
        let out = output(cmd).await;
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("Usage: ocsync"), "{args:?}: {text}");
        let lines = text.lines().count();
        assert!(lines <= 40, "{args:?} help is {lines} lines:\n{text}");
        assert!(
            text.lines().all(|l| l.chars().count() <= 100),
            "{args:?}:\n{text}"
        );
    }
}
