"""The webui's options (``/sdapi/v1/options``): every key the AUTOMATIC1111 webui v1.9/v1.10 has, with its default,
and what it does here (:data:`EFFECTS`). Our own table of those facts (docs/WEBUI_API.md lists the keys with an
effect); no state, no HTTP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# key -> the webui's default. Grouped as the webui's settings page groups them.
DEFAULTS: dict[str, Any] = {
    # saving images / grids
    "samples_save": True, "samples_format": "png", "samples_filename_pattern": "", "save_images_add_number": True,
    "save_images_replace_action": "Replace", "grid_save": True, "grid_format": "png",
    "grid_extended_filename": False, "grid_only_if_multiple": True, "grid_prevent_empty_spots": False,
    "grid_zip_filename_pattern": "", "n_rows": -1, "font": "", "grid_text_active_color": "#000000",
    "grid_text_inactive_color": "#999999", "grid_background_color": "#ffffff",
    "save_images_before_face_restoration": False, "save_images_before_highres_fix": False,
    "save_images_before_color_correction": False, "save_mask": False, "save_mask_composite": False,
    "jpeg_quality": 80, "webp_lossless": False, "export_for_4chan": True, "img_downscale_threshold": 4.0,
    "target_side_length": 4000, "img_max_size_mp": 200, "use_original_name_batch": True,
    "use_upscaler_name_as_suffix": False, "save_selected_only": True, "save_write_log_csv": True,
    "save_init_img": False, "temp_dir": "", "clean_temp_dir_at_start": False, "save_incomplete_images": False,
    "notification_audio": True, "notification_volume": 100,
    # paths for saving
    "outdir_samples": "", "outdir_txt2img_samples": "outputs/txt2img-images",
    "outdir_img2img_samples": "outputs/img2img-images", "outdir_extras_samples": "outputs/extras-images",
    "outdir_grids": "", "outdir_txt2img_grids": "outputs/txt2img-grids",
    "outdir_img2img_grids": "outputs/img2img-grids", "outdir_save": "log/images",
    "outdir_init_images": "outputs/init-images",
    "save_to_dirs": True, "grid_save_to_dirs": True, "use_save_to_dirs_for_ui": False,
    "directories_filename_pattern": "[date]", "directories_max_prompt_words": 8,
    # upscaling, face restoration
    "ESRGAN_tile": 192, "ESRGAN_tile_overlap": 8, "realesrgan_enabled_models": ["R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B"],
    "dat_enabled_models": ["DAT x2", "DAT x3", "DAT x4"], "DAT_tile": 192, "DAT_tile_overlap": 8,
    "upscaler_for_img2img": None, "set_scale_by_when_changing_upscaler": False,
    "face_restoration": False, "face_restoration_model": "CodeFormer", "code_former_weight": 0.5,
    "face_restoration_unload": False,
    # system, profiler, API, training
    "auto_launch_browser": "Local", "enable_console_prompts": False, "show_warnings": False,
    "show_gradio_deprecation_warnings": True, "memmon_poll_rate": 8, "samples_log_stdout": False,
    "multiple_tqdm": True, "enable_upscale_progressbar": True, "print_hypernet_extra": False,
    "list_hidden_files": True, "disable_mmap_load_safetensors": False, "hide_ldm_prints": True,
    "dump_stacks_on_signal": False,
    "profiling_enable": False, "profiling_activities": ["CPU"], "profiling_record_shapes": True,
    "profiling_profile_memory": True, "profiling_with_stack": True, "profiling_filename": "trace.json",
    "api_enable_requests": True, "api_forbid_local_requests": True, "api_useragent": "",
    "unload_models_when_training": False, "pin_memory": False, "save_optimizer_state": False,
    "save_training_settings_to_txt": True, "dataset_filename_word_regex": "", "dataset_filename_join_string": " ",
    "training_image_repeats_per_epoch": 1, "training_write_csv_every": 500,
    "training_xattention_optimizations": False, "training_enable_tensorboard": False,
    "training_tensorboard_save_images": False, "training_tensorboard_flush_every": 120,
    # Stable Diffusion, SDXL, SD3, VAE
    "sd_model_checkpoint": None, "sd_checkpoints_limit": 1, "sd_checkpoints_keep_in_cpu": True,
    "sd_checkpoint_cache": 0, "sd_unet": "Automatic", "enable_quantization": False, "emphasis": "Original",
    "enable_batch_seeds": True, "comma_padding_backtrack": 20, "sdxl_clip_l_skip": False,
    "CLIP_stop_at_last_layers": 1, "upcast_attn": False, "randn_source": "GPU", "tiling": False,
    "hires_fix_refiner_pass": "second pass",
    "sdxl_crop_top": 0, "sdxl_crop_left": 0, "sdxl_refiner_low_aesthetic_score": 2.5,
    "sdxl_refiner_high_aesthetic_score": 6.0, "sd3_enable_t5": False,
    "sd_vae_checkpoint_cache": 0, "sd_vae": "Automatic", "sd_vae_overrides_per_model_preferences": True,
    "auto_vae_precision_bfloat16": False, "auto_vae_precision": True, "sd_vae_encode_method": "Full",
    "sd_vae_decode_method": "Full",
    # img2img
    "inpainting_mask_weight": 1.0, "initial_noise_multiplier": 1.0, "img2img_extra_noise": 0.0,
    "img2img_color_correction": False, "img2img_fix_steps": False, "img2img_background_color": "#ffffff",
    "img2img_editor_height": 720, "img2img_sketch_default_brush_color": "#ffffff",
    "img2img_inpaint_mask_brush_color": "#ffffff", "img2img_inpaint_sketch_default_brush_color": "#ffffff",
    "return_mask": False, "return_mask_composite": False, "img2img_batch_show_results_limit": 32,
    "overlay_inpaint": True,
    # optimizations, compatibility
    "cross_attention_optimization": "Automatic", "s_min_uncond": 0.0, "s_min_uncond_all": False,
    "token_merging_ratio": 0.0, "token_merging_ratio_img2img": 0.0, "token_merging_ratio_hr": 0.0,
    "pad_cond_uncond": False, "pad_cond_uncond_v0": False, "persistent_cond_cache": True, "batch_cond_uncond": True,
    "fp8_storage": "Disable", "cache_fp16_weight": False,
    "auto_backcompat": True, "use_old_emphasis_implementation": False, "use_old_karras_scheduler_sigmas": False,
    "no_dpmpp_sde_batch_determinism": False, "use_old_hires_fix_width_height": False,
    "hires_fix_use_firstpass_conds": False, "use_old_scheduling": False, "use_downcasted_alpha_bar": False,
    "refiner_switch_by_sample_steps": False,
    # interrogate
    "interrogate_keep_models_in_memory": False, "interrogate_return_ranks": False, "interrogate_clip_num_beams": 1,
    "interrogate_clip_min_length": 24, "interrogate_clip_max_length": 48, "interrogate_clip_dict_limit": 1500,
    "interrogate_clip_skip_categories": [], "interrogate_deepbooru_score_threshold": 0.5,
    "deepbooru_sort_alpha": True, "deepbooru_use_spaces": True, "deepbooru_escape": True, "deepbooru_filter_tags": "",
    # extra networks
    "extra_networks_show_hidden_directories": True, "extra_networks_dir_button_function": False,
    "extra_networks_hidden_models": "When searched", "extra_networks_default_multiplier": 1.0,
    "extra_networks_card_width": 0, "extra_networks_card_height": 0, "extra_networks_card_text_scale": 1.0,
    "extra_networks_card_show_desc": True, "extra_networks_card_description_is_html": False,
    "extra_networks_card_order_field": "Path", "extra_networks_card_order": "Ascending",
    "extra_networks_tree_view_style": "Dirs", "extra_networks_tree_view_default_enabled": True,
    "extra_networks_tree_view_default_width": 180, "extra_networks_add_text_separator": " ",
    "ui_extra_networks_tab_reorder": "", "textual_inversion_print_at_load": False,
    "textual_inversion_add_hashes_to_infotext": True, "sd_hypernetwork": "None",
    # user interface
    "keyedit_precision_attention": 0.1, "keyedit_precision_extra": 0.05, "keyedit_delimiters": ".,\\/!?%^*;:{}=`~() ",
    "keyedit_delimiters_whitespace": ["Tab", "Carriage Return", "Line Feed"], "keyedit_move": True,
    "disable_token_counters": False, "include_styles_into_token_counters": True,
    "return_grid": True, "do_not_show_images": False, "js_modal_lightbox": True,
    "js_modal_lightbox_initially_zoomed": True, "js_modal_lightbox_gamepad": False,
    "js_modal_lightbox_gamepad_repeat": 250, "sd_webui_modal_lightbox_icon_opacity": 1,
    "sd_webui_modal_lightbox_toolbar_opacity": 0.9, "gallery_height": "", "open_dir_button_choice": "Subdirectory",
    "compact_prompt_box": False, "samplers_in_dropdown": True, "dimensions_and_batch_together": True,
    "sd_checkpoint_dropdown_use_short": False, "hires_fix_show_sampler": False, "hires_fix_show_prompts": False,
    "txt2img_settings_accordion": False, "img2img_settings_accordion": False, "interrupt_after_current": True,
    "localization": "None", "quicksettings_list": ["sd_model_checkpoint"], "ui_tab_order": [], "hidden_tabs": [],
    "ui_reorder_list": [], "gradio_theme": "Default", "gradio_themes_cache": True, "show_progress_in_title": True,
    "send_seed": True, "send_size": True, "enable_reloading_ui_scripts": False,
    # infotext
    "enable_pnginfo": True, "save_txt": False, "add_model_name_to_info": True, "add_model_hash_to_info": True,
    "add_vae_name_to_info": True, "add_vae_hash_to_info": True, "add_user_name_to_info": False,
    "add_version_to_infotext": True, "disable_weights_auto_swap": True, "infotext_skip_pasting": [],
    "infotext_styles": "Apply if any",
    # live previews
    "show_progressbar": True, "live_previews_enable": True, "live_previews_image_format": "png",
    "show_progress_grid": True, "show_progress_every_n_steps": 10, "show_progress_type": "Approx NN",
    "live_preview_allow_lowvram_full": False, "live_preview_content": "Prompt", "live_preview_refresh_period": 1000,
    "live_preview_fast_interrupt": False, "js_live_preview_in_modal_lightbox": False,
    "prevent_screen_sleep_during_generation": True,
    # sampler parameters
    "hide_samplers": [], "eta_ddim": 0.0, "eta_ancestral": 1.0, "ddim_discretize": "uniform", "s_churn": 0.0,
    "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0, "sigma_min": 0.0, "sigma_max": 0.0, "rho": 0.0,
    "eta_noise_seed_delta": 0, "always_discard_next_to_last_sigma": False, "sgm_noise_multiplier": False,
    "uni_pc_variant": "bh1", "uni_pc_skip_type": "time_uniform", "uni_pc_order": 3, "uni_pc_lower_order_final": True,
    "sd_noise_schedule": "Default", "skip_early_cond": 0.0, "beta_dist_alpha": 0.6, "beta_dist_beta": 0.6,
    # postprocessing
    "postprocessing_enable_in_main_ui": [], "postprocessing_disable_in_extras": [],
    "postprocessing_operation_order": [], "upscaling_max_images_in_cache": 5,
    "postprocessing_existing_caption_action": "Ignore",
    # hidden
    "disabled_extensions": [], "disable_all_extensions": "none", "restore_config_state_file": "",
    "sd_checkpoint_hash": "",
}

# the options that act here: key -> what they do. Every other key is stored and shown, with no effect.
EFFECTS: dict[str, str] = {
    "sd_model_checkpoint": "the checkpoint of the webui routes' requests (setting it loads it)",
    "sd_vae": "the VAE of the webui routes' requests (setting it loads it)",
    "CLIP_stop_at_last_layers": "clip skip of the webui routes' requests",
    "eta_noise_seed_delta": "ENSD of the webui routes' requests",
    "img2img_fix_steps": "img2img runs exactly the requested steps",
    "initial_noise_multiplier": "img2img noise multiplier",
    "upscaler_for_img2img": "the upscaler img2img resizes its init image with",
    "face_restoration": "restore faces in the webui routes' requests that leave restore_faces null",
    "face_restoration_model": "the face restorer of restore_faces (CodeFormer, GFPGAN: a file in models/Codeformer, "
                              "models/GFPGAN)",
    "code_former_weight": "CodeFormer's weight in restore_faces (0: strongest, 1: weakest)",
    "tiling": "seamless tiling in the webui routes' requests that leave tiling null",
    "samples_format": "the format of the images in the webui routes' answers (png, jpg, jpeg, webp)",
    "jpeg_quality": "the quality of JPEG/WebP answer images",
    "webp_lossless": "lossless WebP answer images",
    "sd_vae_encode_method": "the VAE encoder of img2img and the hires fix: Full (the model's) or TAESD",
    "sd_vae_decode_method": "the VAE decoder: Full (the model's) or TAESD (TAESDXL for SDXL)",
    "live_previews_enable": "live previews in /sdapi/v1/progress current_image",
    "show_progress_every_n_steps": "the live previews' interval in sampling steps (-1: none)",
    "show_progress_type": "how live previews are decoded: Approx NN, Approx cheap, TAESD, Full",
    "live_preview_content": "what live previews show: Prompt, Negative prompt, Combined",
    "s_min_uncond": "NGMS: below this sigma every other step skips the negative prompt (0: off; a request's "
                    "s_min_uncond wins)",
    "s_min_uncond_all": "NGMS skips at every step below the sigma",
    "token_merging_ratio": "ToMe ratio (torch backend only; other backends refuse a non-zero ratio)",
    "token_merging_ratio_hr": "ToMe ratio of the hires pass (0: token_merging_ratio)",
    "token_merging_ratio_img2img": "ToMe ratio of img2img when token_merging_ratio is 0",
    "ESRGAN_tile": "tile size of the model upscalers (extras, hires fix, SD upscale), in input pixels; 0: no tiles",
    "ESRGAN_tile_overlap": "overlap of the model upscalers' tiles, in input pixels",
}
# the live-preview options: carried by every webui request (previews are on by default, as in the webui)
PREVIEW_OPTIONS = ("live_previews_enable", "show_progress_every_n_steps", "show_progress_type", "live_preview_content")
# options whose value is one of the webui's names
CHOICES = {"sd_vae_encode_method": ("Full", "TAESD"), "sd_vae_decode_method": ("Full", "TAESD"),
           "show_progress_type": ("Full", "Approx NN", "Approx cheap", "TAESD"),
           "live_preview_content": ("Prompt", "Negative prompt", "Combined")}
# the effect options that act as a request's override_settings (checked as a request is)
REQUEST_OPTIONS = ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "eta_noise_seed_delta",
                   "img2img_fix_steps", "initial_noise_multiplier", "upscaler_for_img2img", "face_restoration",
                   "face_restoration_model", "code_former_weight", "tiling", "sd_vae_encode_method",
                   "sd_vae_decode_method", "s_min_uncond", "s_min_uncond_all", "token_merging_ratio",
                   "token_merging_ratio_hr", "token_merging_ratio_img2img", "ESRGAN_tile", "ESRGAN_tile_overlap",
                   *PREVIEW_OPTIONS)
# options that load a model when they change (POST /options waits for the load, as the webui does)
LOADING_OPTIONS = ("sd_model_checkpoint", "sd_vae")
# options that change the images in the webui and that this engine does not implement (as options): accepted at
# the webui's default only, any other value refused naming the option (the request rule: a field asking for
# something the engine does not do is an error; its inert default is fine). Sampler parameters the engine has as
# request fields (eta, s_churn, ...) are set per request here, not as server-wide defaults.
UNSUPPORTED = frozenset({
    "sd_hypernetwork", "sd_unet", "emphasis", "comma_padding_backtrack",
    "sdxl_clip_l_skip", "sdxl_crop_top", "sdxl_crop_left", "enable_quantization", "enable_batch_seeds",
    "randn_source", "inpainting_mask_weight", "img2img_extra_noise",
    "img2img_color_correction", "pad_cond_uncond", "pad_cond_uncond_v0",
    "fp8_storage", "use_old_emphasis_implementation", "use_old_karras_scheduler_sigmas",
    "no_dpmpp_sde_batch_determinism", "use_old_hires_fix_width_height", "hires_fix_use_firstpass_conds",
    "use_old_scheduling", "use_downcasted_alpha_bar", "extra_networks_default_multiplier", "eta_ddim",
    "eta_ancestral", "ddim_discretize", "s_churn", "s_tmin", "s_tmax", "s_noise", "sigma_min", "sigma_max", "rho",
    "always_discard_next_to_last_sigma", "sgm_noise_multiplier", "uni_pc_variant", "uni_pc_skip_type",
    "uni_pc_order", "uni_pc_lower_order_final", "sd_noise_schedule", "skip_early_cond", "beta_dist_alpha",
    "beta_dist_beta",
    # the SDXL refiner runs at the webui's defaults of these (engine.refiner, docs/DECISIONS.md)
    "sdxl_refiner_low_aesthetic_score", "sdxl_refiner_high_aesthetic_score", "hires_fix_refiner_pass",
    "refiner_switch_by_sample_steps",
})
# the webui's restrict_api options: POST /options accepts them and leaves them unchanged (as the webui does)
API_RESTRICTED = frozenset({"api_enable_requests", "api_forbid_local_requests", "api_useragent"})
# options only the server sets (GET shows them; a client posting them back unchanged is fine)
READ_ONLY = frozenset({"sd_checkpoint_hash"})
SAMPLES_FORMATS = ("png", "jpg", "jpeg", "webp")
# bounds: one option's value (as JSON), and the whole options body
MAX_VALUE_BYTES = 4096
MAX_BODY_BYTES = 256 * 1024


@dataclass(frozen=True)
class OptionProblem(Exception):
    """An option value that does not fit the table (wrong type, out of range, too large)."""

    key: str
    message: str
    allowed: str


def _type_name(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, list):
        return "a list of strings"
    return "a string" if default is not None else "a string or null"


def check_value(key: str, value: Any) -> Any:
    """``value`` for option ``key`` when it has the type of the option's default (an int for a float default is
    taken as a float) and fits :data:`MAX_VALUE_BYTES`; raises :class:`OptionProblem` naming the key otherwise.
    The request options (:data:`REQUEST_OPTIONS`) are checked further as a request's override_settings are."""
    import json

    default = DEFAULTS[key]
    size = len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
    if size > MAX_VALUE_BYTES:
        raise OptionProblem(key, f"the value is {size} bytes", f"at most {MAX_VALUE_BYTES} bytes")
    ok = True
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:  # None default: a name or nothing
        ok = value is None or isinstance(value, str)
    if not ok:
        raise OptionProblem(key, f"must be {_type_name(default)}, got {type(value).__name__}", _type_name(default))
    if key in UNSUPPORTED and value != default:
        raise OptionProblem(key, f"not supported: {value!r} asks for something this engine does not do as a server "
                            "option; leave it at the webui's default", json.dumps(default))
    if key == "samples_format" and value.lower() not in SAMPLES_FORMATS:
        raise OptionProblem(key, f"{value!r} is not a format the answers can have", ", ".join(SAMPLES_FORMATS))
    if key in CHOICES and value not in CHOICES[key]:
        raise OptionProblem(key, f"unknown value {value!r}", ", ".join(CHOICES[key]))
    if key == "show_progress_every_n_steps" and value < -1:
        raise OptionProblem(key, f"{value} is out of range", "-1 (no live previews), 0 (every step) or more")
    if key == "jpeg_quality" and not 1 <= value <= 100:
        raise OptionProblem(key, f"{value} is out of range", "an integer from 1 to 100")
    return value
