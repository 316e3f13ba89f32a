from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('surveys', '0009_study_validity_lifecycle_panels'),
    ]

    operations = [
        migrations.AddField(
            model_name='subject',
            name='reid_features',
            field=models.JSONField(blank=True, help_text='re-identification features (pipeline.reid_features.features_to_json)', null=True),
        ),
        migrations.AddField(
            model_name='reidsummary',
            name='metrics',
            field=models.JSONField(blank=True, default=dict, help_text='pipeline.reid.evaluate_study result: every matcher and the fusion, both conditions, CIs, chance'),
        ),
    ]
