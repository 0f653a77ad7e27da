//! A1111's extra networks in a prompt: `<lora:NAME:WEIGHT>` (or `<lora:NAME:TE_W:UNET_W>`,
//! or `<lora:NAME>` for weight 1) asks for a LoRA and is taken out of the text before it is
//! encoded.

/// One `<lora:...>` tag: the LoRA's name and its text-encoder and U-Net weights.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTag {
    pub name: String,
    pub text_weight: f64,
    pub unet_weight: f64,
}

/// The prompt without its `<lora:...>` tags, and the tags. A tag whose weights are not
/// numbers is an error naming it.
pub fn take_lora_tags(prompt: &str) -> Result<(String, Vec<LoraTag>), String> {
    let mut text = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        let Some(len) = rest[start..].find('>') else {
            break;
        };
        let inner = &rest[start + "<lora:".len()..start + len];
        let parts: Vec<&str> = inner.split(':').collect();
        let number = |s: &str| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|w| w.is_finite())
                .ok_or_else(|| format!("`<lora:{inner}>`: `{s}` is not a weight"))
        };
        let (name, te, unet) = match parts.as_slice() {
            [name] => (*name, 1.0, 1.0),
            [name, w] => {
                let w = number(w)?;
                (*name, w, w)
            }
            [name, te, unet, ..] => (*name, number(te)?, number(unet)?),
            [] => unreachable!("split gives at least one part"),
        };
        if name.trim().is_empty() {
            return Err(format!("`<lora:{inner}>` names no LoRA"));
        }
        tags.push(LoraTag {
            name: name.trim().to_string(),
            text_weight: te,
            unet_weight: unet,
        });
        text.push_str(&rest[..start]);
        rest = &rest[start + len + 1..];
    }
    text.push_str(rest);
    Ok((text, tags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_taken_out_with_their_weights() {
        let (text, tags) =
            take_lora_tags("a cat <lora:style:0.7>, <lora:eyes:0.5:1.2> <lora:x>").unwrap();
        assert_eq!(text, "a cat ,  ");
        assert_eq!(
            tags,
            [
                LoraTag {
                    name: "style".into(),
                    text_weight: 0.7,
                    unet_weight: 0.7
                },
                LoraTag {
                    name: "eyes".into(),
                    text_weight: 0.5,
                    unet_weight: 1.2
                },
                LoraTag {
                    name: "x".into(),
                    text_weight: 1.0,
                    unet_weight: 1.0
                },
            ]
        );
        assert!(take_lora_tags("<lora:a:strong>")
            .unwrap_err()
            .contains("not a weight"));
        assert!(take_lora_tags("<lora::1>").is_err());
        assert_eq!(take_lora_tags("no <lora: tag").unwrap().0, "no <lora: tag");
    }
}
