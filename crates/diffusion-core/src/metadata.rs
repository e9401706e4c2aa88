//! Generation parameters written into PNG text chunks, in the A1111 "parameters" style that
//! image viewers and model sites already read. Shared by the command line and by the validation
//! images of the training loops.

/// The parameters of one generation run, in display order.
#[derive(Clone, Debug, Default)]
pub struct GenerationParameters {
    /// `(name, value)` pairs such as `("Steps", "50")`.
    pub fields: Vec<(String, String)>,
    /// The prompt, if any (first line of the A1111 text).
    pub prompt: Option<String>,
    /// The negative prompt, if any (the A1111 `Negative prompt:` line).
    pub negative_prompt: Option<String>,
}

impl GenerationParameters {
    /// Add one field.
    pub fn push(&mut self, name: &str, value: impl ToString) {
        self.fields.push((name.to_string(), value.to_string()));
    }

    /// The A1111-style text: the prompt line, then `Name: value, Name: value`.
    pub fn a1111_text(&self) -> String {
        let line = self
            .fields
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut text = String::new();
        if let Some(p) = &self.prompt {
            text.push_str(p);
            text.push('\n');
        }
        if let Some(n) = &self.negative_prompt {
            text.push_str(&format!("Negative prompt: {n}\n"));
        }
        text.push_str(&line);
        text
    }

    /// The PNG text chunks: `parameters`, `Software`, and one chunk per field for tools that
    /// read keys individually.
    pub fn png_chunks(&self) -> Vec<(String, String)> {
        let mut chunks = vec![
            ("parameters".to_string(), self.a1111_text()),
            (
                "Software".to_string(),
                format!("diffusers-rs {}", env!("CARGO_PKG_VERSION")),
            ),
        ];
        for (k, v) in &self.fields {
            chunks.push((format!("diffusers:{k}"), v.clone()));
        }
        chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1111_layout() {
        let mut p = GenerationParameters::default();
        p.push("Steps", 50);
        p.push("Seed", 42);
        assert_eq!(p.a1111_text(), "Steps: 50, Seed: 42");
        p.prompt = Some("a cat".into());
        assert_eq!(p.a1111_text(), "a cat\nSteps: 50, Seed: 42");
        assert_eq!(p.png_chunks()[0].0, "parameters");
        p.negative_prompt = Some("blurry".into());
        assert_eq!(
            p.a1111_text(),
            "a cat\nNegative prompt: blurry\nSteps: 50, Seed: 42"
        );
    }
}
