"""Studies: views balanced across conditions (new studies; earlier ones keep drawing a view
pair per trial); answers record which images the rater enlarged."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("surveys", "0010_reid_metrics"),
    ]

    operations = [
        # existing studies keep the assignment they were planned with
        migrations.AddField(
            model_name="study",
            name="view_assignment",
            field=models.CharField(
                choices=[("balanced", "the same target/candidate view pairs in every condition"),
                         ("random", "a view pair drawn per trial")],
                default="random", max_length=10, verbose_name="view assignment",
                help_text="balanced: both conditions get the same target/candidate view pairs; "
                          "random (studies created before): drawn per trial"),
        ),
        migrations.AlterField(
            model_name="study",
            name="view_assignment",
            field=models.CharField(
                choices=[("balanced", "the same target/candidate view pairs in every condition"),
                         ("random", "a view pair drawn per trial")],
                default="balanced", max_length=10, verbose_name="view assignment",
                help_text="balanced: both conditions get the same target/candidate view pairs; "
                          "random (studies created before): drawn per trial"),
        ),
        migrations.AddField(
            model_name="answer",
            name="enlarged",
            field=models.JSONField(
                blank=True, default=list,
                help_text="images the rater enlarged before answering: 0 = target, "
                          "1..k = candidates"),
        ),
    ]
