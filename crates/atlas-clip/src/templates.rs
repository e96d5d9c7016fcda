//! Zero-shot prompt templates: OpenAI CLIP's per-data-set prompts, as used by the task-vector
//! and aTLAS code bases (`src/datasets/templates.py`), for the 22 data sets of the aTLAS paper.
//! A template holds one `{}` where the class name goes.

/// Data set names, in the spelling of the aTLAS code base.
const DATASETS: [&str; 22] = [
    "Cars",
    "DTD",
    "EuroSAT",
    "GTSRB",
    "MNIST",
    "RESISC45",
    "SUN397",
    "SVHN",
    "CIFAR10",
    "CIFAR100",
    "ImageNet",
    "STL10",
    "Food101",
    "Caltech101",
    "Caltech256",
    "FGVCAircraft",
    "Flowers102",
    "OxfordIIITPet",
    "CUB200",
    "PascalVOC",
    "Country211",
    "UCF101",
];

/// The 22 supported data set names.
pub fn dataset_names() -> &'static [&'static str] {
    &DATASETS
}

/// Templates for a data set, matched case-insensitively; a trailing `Val` (the validation
/// split's name in the aTLAS code, e.g. `MNISTVal`) is ignored. `None` for unknown names.
pub fn templates_for(dataset: &str) -> Option<&'static [&'static str]> {
    let name = dataset.trim();
    let name = match name.len().checked_sub(3) {
        Some(cut) if name.is_char_boundary(cut) && name[cut..].eq_ignore_ascii_case("val") => {
            &name[..cut]
        }
        _ => name,
    };
    let templates: &'static [&'static str] = match name.to_ascii_lowercase().as_str() {
        "cars" => &CARS,
        "dtd" => &DTD,
        "eurosat" => &EUROSAT,
        "gtsrb" => &GTSRB,
        "mnist" | "svhn" => &NUMBER,
        "resisc45" => &RESISC45,
        "sun397" | "stl10" => &PHOTO,
        "cifar10" | "cifar100" => &CIFAR,
        "imagenet" => &IMAGENET,
        "food101" => &FOOD101,
        "caltech101" | "caltech256" => &CALTECH,
        "fgvcaircraft" => &FGVC_AIRCRAFT,
        "flowers102" => &FLOWERS102,
        "oxfordiiitpet" => &OXFORD_PET,
        "cub200" => &CUB200,
        "pascalvoc" => &PASCAL_VOC,
        "country211" => &COUNTRY211,
        "ucf101" => &UCF101,
        _ => return None,
    };
    Some(templates)
}

/// Generic templates for data sets without their own: the 7-prompt ensemble OpenAI selected
/// for ImageNet (CLIP repo, `notebooks/Prompt_Engineering_for_ImageNet.ipynb`).
pub fn default_templates() -> &'static [&'static str] {
    &DEFAULT
}

/// Most templates in one head.
pub const MAX_TEMPLATES: usize = 100;
/// Longest template (or class name), in bytes (the tokenizer keeps 77 tokens anyway).
pub const MAX_TEXT: usize = 1000;

/// The templates a head is asked for, as the API and the CLI take them: a data set's name
/// ("default" for the generic ones), or templates of their own, each with one `{}`. The error
/// says what was wrong, for either to report.
pub fn resolve(specs: &[String]) -> Result<Vec<String>, String> {
    match specs {
        [name] if !name.contains("{}") => check(named(name)?),
        list => check(list.to_vec()),
    }
}

/// `list` when it is a valid set of templates (1 to 100, each with one `{}`, short, no NUL).
pub fn check(list: Vec<String>) -> Result<Vec<String>, String> {
    if list.is_empty() || list.len() > MAX_TEMPLATES {
        return Err(format!(
            "give between 1 and {MAX_TEMPLATES} templates, got {}",
            list.len()
        ));
    }
    if let Some(bad) = list
        .iter()
        .find(|t| t.matches("{}").count() != 1 || t.len() > MAX_TEXT || t.contains('\0'))
    {
        let shown: String = bad.chars().take(80).collect();
        return Err(format!(
            "template {shown:?} must contain exactly one {{}} for the class name, no NUL, at \
             most {MAX_TEXT} bytes"
        ));
    }
    Ok(list)
}

fn named(name: &str) -> Result<Vec<String>, String> {
    let list = if name == "default" {
        default_templates()
    } else {
        templates_for(name).ok_or_else(|| {
            format!(
                "no templates for data set {name:?}; known: default, {} (or give templates \
                 of your own, each with one {{}})",
                dataset_names().join(", ")
            )
        })?
    };
    Ok(list.iter().map(|s| s.to_string()).collect())
}

/// Put a class name into a template (every `{}` is replaced).
pub fn fill(template: &str, class: &str) -> String {
    template.replace("{}", class)
}

const DEFAULT: [&str; 7] = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
];

const CARS: [&str; 8] = [
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of my {}.",
    "i love my {}!",
    "a photo of my dirty {}.",
    "a photo of my clean {}.",
    "a photo of my new {}.",
    "a photo of my old {}.",
];

/// CIFAR-10 and CIFAR-100 share one list.
const CIFAR: [&str; 18] = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
];

const DTD: [&str; 8] = [
    "a photo of a {} texture.",
    "a photo of a {} pattern.",
    "a photo of a {} thing.",
    "a photo of a {} object.",
    "a photo of the {} texture.",
    "a photo of the {} pattern.",
    "a photo of the {} thing.",
    "a photo of the {} object.",
];

const EUROSAT: [&str; 3] = [
    "a centered satellite photo of {}.",
    "a centered satellite photo of a {}.",
    "a centered satellite photo of the {}.",
];

const FOOD101: [&str; 1] = ["a photo of {}, a type of food."];

const GTSRB: [&str; 3] = [
    "a zoomed in photo of a \"{}\" traffic sign.",
    "a centered photo of a \"{}\" traffic sign.",
    "a close up photo of a \"{}\" traffic sign.",
];

/// MNIST and SVHN.
const NUMBER: [&str; 1] = ["a photo of the number: \"{}\"."];

const IMAGENET: [&str; 80] = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
];

const RESISC45: [&str; 18] = [
    "satellite imagery of {}.",
    "aerial imagery of {}.",
    "satellite photo of {}.",
    "aerial photo of {}.",
    "satellite view of {}.",
    "aerial view of {}.",
    "satellite imagery of a {}.",
    "aerial imagery of a {}.",
    "satellite photo of a {}.",
    "aerial photo of a {}.",
    "satellite view of a {}.",
    "aerial view of a {}.",
    "satellite imagery of the {}.",
    "aerial imagery of the {}.",
    "satellite photo of the {}.",
    "aerial photo of the {}.",
    "satellite view of the {}.",
    "aerial view of the {}.",
];

/// SUN397 and STL10.
const PHOTO: [&str; 2] = ["a photo of a {}.", "a photo of the {}."];

/// UCF101: every (article, verb) combination of the original list, in its order.
const UCF101: [&str; 48] = [
    "a photo of a person {}.",
    "a video of a person {}.",
    "a example of a person {}.",
    "a demonstration of a person {}.",
    "a photo of the person {}.",
    "a video of the person {}.",
    "a example of the person {}.",
    "a demonstration of the person {}.",
    "a photo of a person using {}.",
    "a video of a person using {}.",
    "a example of a person using {}.",
    "a demonstration of a person using {}.",
    "a photo of the person using {}.",
    "a video of the person using {}.",
    "a example of the person using {}.",
    "a demonstration of the person using {}.",
    "a photo of a person doing {}.",
    "a video of a person doing {}.",
    "a example of a person doing {}.",
    "a demonstration of a person doing {}.",
    "a photo of the person doing {}.",
    "a video of the person doing {}.",
    "a example of the person doing {}.",
    "a demonstration of the person doing {}.",
    "a photo of a person during {}.",
    "a video of a person during {}.",
    "a example of a person during {}.",
    "a demonstration of a person during {}.",
    "a photo of the person during {}.",
    "a video of the person during {}.",
    "a example of the person during {}.",
    "a demonstration of the person during {}.",
    "a photo of a person performing {}.",
    "a video of a person performing {}.",
    "a example of a person performing {}.",
    "a demonstration of a person performing {}.",
    "a photo of the person performing {}.",
    "a video of the person performing {}.",
    "a example of the person performing {}.",
    "a demonstration of the person performing {}.",
    "a photo of a person practicing {}.",
    "a video of a person practicing {}.",
    "a example of a person practicing {}.",
    "a demonstration of a person practicing {}.",
    "a photo of the person practicing {}.",
    "a video of the person practicing {}.",
    "a example of the person practicing {}.",
    "a demonstration of the person practicing {}.",
];

/// Caltech101 and Caltech256.
const CALTECH: [&str; 34] = [
    "a photo of a {}.",
    "a painting of a {}.",
    "a plastic {}.",
    "a sculpture of a {}.",
    "a sketch of a {}.",
    "a tattoo of a {}.",
    "a toy {}.",
    "a rendition of a {}.",
    "a embroidered {}.",
    "a cartoon {}.",
    "a {} in a video game.",
    "a plushie {}.",
    "a origami {}.",
    "art of a {}.",
    "graffiti of a {}.",
    "a drawing of a {}.",
    "a doodle of a {}.",
    "a photo of the {}.",
    "a painting of the {}.",
    "the plastic {}.",
    "a sculpture of the {}.",
    "a sketch of the {}.",
    "a tattoo of the {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "the embroidered {}.",
    "the cartoon {}.",
    "the {} in a video game.",
    "the plushie {}.",
    "the origami {}.",
    "art of the {}.",
    "graffiti of the {}.",
    "a drawing of the {}.",
    "a doodle of the {}.",
];

const FGVC_AIRCRAFT: [&str; 2] = [
    "a photo of a {}, a type of aircraft.",
    "a photo of the {}, a type of aircraft.",
];

const FLOWERS102: [&str; 1] = ["a photo of a {}, a type of flower."];

const OXFORD_PET: [&str; 1] = ["a photo of a {}, a type of pet."];

const CUB200: [&str; 1] = ["a photo of a {}, a type of bird."];

const PASCAL_VOC: [&str; 1] = ["a photo of a {}."];

const COUNTRY211: [&str; 5] = [
    "a photo i took in {}.",
    "a photo i took while visiting {}.",
    "a photo from my home country of {}.",
    "a photo from my visit to {}.",
    "a photo showing the country of {}.",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dataset_has_templates_with_one_slot() {
        for name in dataset_names() {
            let templates = templates_for(name).unwrap_or_else(|| panic!("{name}"));
            assert!(!templates.is_empty(), "{name}");
            for t in templates.iter().chain(default_templates()) {
                assert_eq!(t.matches("{}").count(), 1, "{name}: {t}");
            }
        }
        assert_eq!(dataset_names().len(), 22);
    }

    #[test]
    fn known_texts() {
        assert_eq!(
            templates_for("MNIST").unwrap(),
            &["a photo of the number: \"{}\"."]
        );
        assert!(templates_for("EuroSAT")
            .unwrap()
            .contains(&"a centered satellite photo of {}."));
        assert_eq!(templates_for("ImageNet").unwrap().len(), 80);
        assert_eq!(default_templates().len(), 7);
    }

    #[test]
    fn names_are_case_insensitive_and_val_is_stripped() {
        for name in ["mnist", "MNIST", "MNISTVal", "mnistval", " Mnist "] {
            assert_eq!(templates_for(name), templates_for("MNIST"), "{name}");
        }
        assert_eq!(templates_for("EuroSATVal"), templates_for("eurosat"));
        assert!(templates_for("Val").is_none());
        assert!(templates_for("unknown").is_none());
        assert!(templates_for("").is_none());
        assert!(templates_for("é").is_none());
    }

    #[test]
    fn fill_puts_the_class_in() {
        assert_eq!(fill("a photo of a {}.", "dog"), "a photo of a dog.");
    }
}
